# ckpt_truncated.kt: the checkpoint file is empty, as after a crash mid-write (the test writes it)
# expect: E601
graph ckpt_truncated
data digits { val_split = 300 }
node a : cnn_tiny  [target]
node t : cnn_small [frozen, init="teacher.pt"]
label -> a : through
t     -> a : through kl(T=2)
