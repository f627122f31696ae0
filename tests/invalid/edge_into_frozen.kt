# edge_into_frozen.kt: a live edge into a node declared frozen
# expect: E308
graph edge_into_frozen
data digits { val_split = 300 }
node a : cnn_tiny  [target]
node b : cnn_small [frozen]
label -> a : through
label -> b : through
b     -> a : through
