# ensemble_contains_itself.kt: an ensemble listing itself as a member
# expect: E330
graph ensemble_contains_itself
data digits { val_split = 300 }
node a : cnn_tiny [target]
node b : cnn_small
node c : mlp
node e : ensemble(b, c, e)
e -> a : through
label -> a : through
label -> b : through
label -> c : through
