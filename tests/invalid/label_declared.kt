# label_declared.kt: `label` is reserved for the ground truth
# expect: E307
graph label_declared
data digits { val_split = 300 }
node label : cnn_tiny
node a     : cnn_tiny [target]
label -> a : through
