# branch_arguments.kt: a branch needs from= and takes nothing else (did-you-mean)
# expect: E352 E352
graph branch_arguments
data digits { val_split = 300 }
node a : resnet20 [target]
node b : branch(a, form=layer3)
label -> a : through
label -> b : through
b -> a : through
