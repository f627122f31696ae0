# branch_of_frozen.kt: a branch trains its trunk: never of a frozen node, never frozen itself (declared, or by having no edge into it)
# expect: E355 E355 E355 W503
graph branch_of_frozen
data digits { val_split = 300 }
node a : resnet20 [target]
node t : resnet20 [frozen]
node b : branch(t, from=layer3)
node c : branch(a, from=layer3) [frozen]
c -> a : through
label -> a : through
label -> b : through
b -> a : through
t -> a : through
node d : branch(a, from=layer2)
d -> a : through
