# edge_into_learned_ensemble.kt: only `label` trains a learned ensemble
# expect: E372
graph edge_into_learned_ensemble
data digits { val_split = 300 }
node a : cnn_tiny [target]
node b : cnn_small
node e : ensemble(a, b) [combine=learned]
label -> a : through
label -> b : through
label -> e : through
a     -> e : through
e     -> a : through
