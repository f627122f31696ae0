# misspelt_node.kt: an edge names a node that was declared with another spelling
# expect: E201 W500
graph misspelt_node
data cifar100 { val_split = 5000 }
node student : resnet32 [target]
node teacher : resnet110 [frozen]
label   -> student : through
teachr  -> student : through kl(T=2)
