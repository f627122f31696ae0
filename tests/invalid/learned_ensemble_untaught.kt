# learned_ensemble_untaught.kt: a learned ensemble's weights need an edge from `label`
# expect: E371
graph learned_ensemble_untaught
data digits { val_split = 300 }
node a : cnn_tiny [target]
node b : cnn_small
node e : ensemble(a, b) [combine=learned]
label -> a : through
label -> b : through
e     -> a : through
