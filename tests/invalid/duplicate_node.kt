# duplicate_node.kt: two nodes with one name
# expect: E300
graph duplicate_node
data digits { val_split = 300 }
node a : cnn_tiny [target]
node b : cnn_small
node b : mlp
label -> a : through
label -> b : through
b     -> a : through
