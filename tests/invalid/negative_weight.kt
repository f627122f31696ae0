# negative_weight.kt: a loss weight cannot be negative
# expect: E402
graph negative_weight
data digits { val_split = 300 }
node a : cnn_tiny [target]
node b : cnn_small
label -> a : through
label -> b : through
b     -> a : through kl(weight=-0.5)
