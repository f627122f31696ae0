# no_target.kt: no node is marked as the target
# expect: E305
graph no_target
data digits { val_split = 300 }
node a : cnn_tiny
label -> a : through
