# ema_of_ensemble.kt: an ensemble's output is a mean of networks, not one network's weights
# expect: E342
graph g
data digits { val_split = 300 }
node a : cnn_tiny [target]
node b : cnn_tiny
node e : ensemble(a, b)
node t : ema(e)
label -> a : through
label -> b : through
t -> a : through
