# ema_of_branch.kt: a mean teacher of a branch sharing another network's trunk is not supported
# expect: E347
graph g
data digits { val_split = 300 }
node a : cnn_tiny [target]
node b : branch(a, from=conv2)
node t : ema(b)
label -> a : through
label -> b : through
t -> a : through
