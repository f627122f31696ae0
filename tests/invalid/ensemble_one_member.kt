# ensemble_one_member.kt: an ensemble of a single node
# expect: E331
graph ensemble_one_member
data digits { val_split = 300 }
node a : cnn_tiny [target]
node b : cnn_small
node c : mlp
node e : ensemble(b)
e -> a : through
c -> a : through
label -> a : through
label -> b : through
label -> c : through
