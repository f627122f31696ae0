# ensemble_frozen.kt: an ensemble marked frozen (it has no weights)
# expect: E333
graph ensemble_frozen
data digits { val_split = 300 }
node a : cnn_tiny [target]
node b : cnn_small
node c : mlp
node e : ensemble(b, c) [frozen]
e -> a : through
label -> a : through
label -> b : through
label -> c : through
