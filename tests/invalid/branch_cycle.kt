# branch_cycle.kt: branches of each other share no network's trunk
# expect: E351 E351
graph branch_cycle
data digits { val_split = 300 }
node a : resnet20 [target]
node l : branch(m, from=layer3)
node m : branch(l, from=layer3)
label -> a : through
label -> l : through
l -> a : through
label -> m : through
m -> a : through
