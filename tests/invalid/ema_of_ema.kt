# ema_of_ema.kt: a mean teacher of a mean teacher is refused (average the trained network)
# expect: E342
graph g
data digits { val_split = 300 }
node s : cnn_tiny [target]
node t : ema(s)
node tt : ema(t)
label -> s : through
tt -> s : through
