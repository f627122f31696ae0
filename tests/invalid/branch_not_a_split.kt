# branch_not_a_split.kt: a module inside a residual block does not split the network
# expect: E354
graph branch_not_a_split
data digits { val_split = 300 }
node a : resnet20 [target]
node b : branch(a, from="layer3.0.conv2")
label -> a : through
label -> b : through
b -> a : through
