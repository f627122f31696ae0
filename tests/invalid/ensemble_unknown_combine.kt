# ensemble_unknown_combine.kt: a misspelt way to combine
# expect: E210
graph ensemble_unknown_combine
data digits { val_split = 300 }
node a : cnn_tiny [target]
node b : cnn_small
node c : mlp
node e : ensemble(b, c) [combine=mean_prob]
e -> a : through
label -> a : through
label -> b : through
label -> c : through
