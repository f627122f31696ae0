# ensemble_cycle.kt: two ensembles that contain each other
# expect: E330
graph ensemble_cycle
data digits { val_split = 300 }
node a : cnn_tiny [target]
node b : cnn_small
node c : mlp
node e : ensemble(a, f)
node f : ensemble(b, c, e)
e -> a : through
f -> a : through
label -> a : through
label -> b : through
label -> c : through
