# ckpt_is_directory.kt: the teacher's checkpoint path names a folder
# expect: E600
graph ckpt_is_directory
data digits { val_split = 300 }
node a : cnn_tiny  [target]
node t : cnn_small [frozen, init="teacher.pt"]
label -> a : through
t     -> a : through kl(T=2)
