# ema_unknown_source.kt: a mean teacher of a node that is not declared
# expect: E340
graph g
data digits { val_split = 300 }
node student : cnn_tiny [target]
node t : ema(studnet)
label -> student : through
t -> student : through
