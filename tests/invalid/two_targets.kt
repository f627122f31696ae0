# two_targets.kt: only one node can be the target
# expect: E306
graph two_targets
data digits { val_split = 300 }
node a : cnn_tiny  [target]
node b : cnn_small [target]
label -> a : through
label -> b : through
