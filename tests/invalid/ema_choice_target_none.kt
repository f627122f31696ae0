# ema_choice_target_none.kt: the target may be left out of a trial
# expect: E348
graph g
data digits { val_split = 300 }
node s : cnn_tiny
node t : choice(ema(s), none) [target]
label -> s : through
