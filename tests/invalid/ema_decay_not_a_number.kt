# ema_decay_not_a_number.kt: `decay` is a number
# expect: E343
graph g
data digits { val_split = 300 }
node s : cnn_tiny
node t : ema(s, decay=high) [target]
label -> s : through
