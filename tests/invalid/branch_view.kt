# branch_view.kt: a branch reads its source's view, on which its trunk is computed once
# expect: E356
graph branch_view
data digits { val_split = 300 }
node a : resnet20 [target, view=own]
node b : branch(a, from=layer3) [view=shared]
label -> a : through
label -> b : through
b -> a : through
