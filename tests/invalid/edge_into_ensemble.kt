# edge_into_ensemble.kt: an ensemble is only a source (and not trained yet at all)
# expect: E313
graph edge_into_ensemble
data digits { val_split = 300 }
node a : cnn_tiny [target]
node b : cnn_small
node c : cnn_small
node e : ensemble(b, c)
label -> a : through
label -> b : through
label -> c : through
e     -> a : through
a     -> e : through
