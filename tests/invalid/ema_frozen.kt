# ema_frozen.kt: `frozen` on a mean teacher, whose weights change after every update
# expect: E346
graph g
data digits { val_split = 300 }
node s : cnn_tiny [target]
node t : ema(s) [frozen]
label -> s : through
t -> s : through
