# ensemble_duplicate_member.kt: a member listed twice
# expect: E332
graph ensemble_duplicate_member
data digits { val_split = 300 }
node a : cnn_tiny [target]
node b : cnn_small
node c : mlp
node e : ensemble(b, c, b)
e -> a : through
label -> a : through
label -> b : through
label -> c : through
