# ckpt_missing.kt: the teacher's checkpoint is not there
# expect: E600
graph ckpt_missing
data digits { val_split = 300 }
node a : cnn_tiny  [target]
node t : cnn_small [frozen, init="teacher.pt"]
label -> a : through
t     -> a : through kl(T=2)
