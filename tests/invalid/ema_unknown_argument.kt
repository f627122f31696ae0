# ema_unknown_argument.kt: `ema` takes its source and `decay`
# expect: E344
graph g
data digits { val_split = 300 }
node s : cnn_tiny
node t : ema(s, decy=0.99) [target]
label -> s : through
