# ce_between_nodes.kt: between two nodes the loss is KL (paper eq. 2)
# expect: E312
graph ce_between_nodes
data digits { val_split = 300 }
node a : cnn_tiny [target]
node b : cnn_small
label -> a : through
label -> b : through
b     -> a : through ce()
