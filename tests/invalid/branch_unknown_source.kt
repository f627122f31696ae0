# branch_unknown_source.kt: a branch shares a declared network's trunk (did-you-mean)
# expect: E350
graph branch_unknown_source
data digits { val_split = 300 }
node a : resnet20 [target]
node b : branch(aa, from=layer3)
label -> a : through
label -> b : through
b -> a : through
