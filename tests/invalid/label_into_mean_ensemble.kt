# label_into_mean_ensemble.kt: a mean ensemble has no weights for `label` to train
# expect: E370
graph label_into_mean_ensemble
data digits { val_split = 300 }
node a : cnn_tiny [target]
node b : cnn_small
node e : ensemble(a, b)
label -> a : through
label -> b : through
label -> e : through
e     -> a : through
