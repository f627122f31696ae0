# ema_of_frozen.kt: a frozen node never changes, so its average would not either
# expect: E341
graph g
data digits { val_split = 300 }
node s : cnn_tiny [target]
node f : cnn_tiny [frozen]
node t : ema(f)
label -> s : through
f -> s : through
t -> s : through
