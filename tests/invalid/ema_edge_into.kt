# ema_edge_into.kt: a mean teacher learns from no loss: its weights are its source's averaged
# expect: E345
graph g
data digits { val_split = 300 }
node s : cnn_tiny
node t : ema(s) [target]
label -> s : through
label -> t : through
