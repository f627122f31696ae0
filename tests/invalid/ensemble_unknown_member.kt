# ensemble_unknown_member.kt: an ensemble member that is not declared
# expect: E201
graph ensemble_unknown_member
data digits { val_split = 300 }
node a : cnn_tiny [target]
node b : cnn_small
node c : mlp
node e : ensemble(b, bb, c)
e -> a : through
label -> a : through
label -> b : through
label -> c : through
