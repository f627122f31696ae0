# ensemble_misplaced_attributes.kt: init on an ensemble, combine on a network
# expect: E334 E334
graph ensemble_misplaced_attributes
data digits { val_split = 300 }
node a : cnn_tiny [target]
node b : cnn_small
node c : mlp
node e : ensemble(b, c) [init="e.pt"]
node d : cnn_tiny [combine=mean_probs]
label -> d : through
e -> a : through
d -> a : through
label -> a : through
label -> b : through
label -> c : through
