# branch_unknown_layer.kt: from= names a layer of the architecture (did-you-mean)
# expect: E353
graph branch_unknown_layer
data digits { val_split = 300 }
node a : resnet20 [target]
node b : branch(a, from=layr3)
label -> a : through
label -> b : through
b -> a : through
