# ema_decay_out_of_range.kt: a decay of 1 never moves, 0 copies the source
# expect: E343
graph g
data digits { val_split = 300 }
node s : cnn_tiny
node t : ema(s, decay=1) [target]
label -> s : through
