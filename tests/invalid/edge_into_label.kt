# edge_into_label.kt: `label` is only ever a source
# expect: E302
graph edge_into_label
data digits { val_split = 300 }
node a : cnn_tiny [target]
label -> a     : through
a     -> label : through
