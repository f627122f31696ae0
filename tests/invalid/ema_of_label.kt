# ema_of_label.kt: `label` has no weights to average
# expect: E341
graph g
data digits { val_split = 300 }
node s : cnn_tiny [target]
node t : ema(label)
label -> s : through
t -> s : through
