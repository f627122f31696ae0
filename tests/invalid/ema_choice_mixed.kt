# ema_choice_mixed.kt: a mean teacher in one trial and another network in the next
# expect: E348
graph g
data digits { val_split = 300 }
node s : cnn_tiny [target]
node t : choice(ema(s), cnn_small)
label -> s : through
t -> s : through
