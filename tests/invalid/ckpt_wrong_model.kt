# ckpt_wrong_model.kt: the checkpoint holds a cnn_tiny, the node is a cnn_small (the test writes it)
# expect: E602
graph ckpt_wrong_model
data digits { val_split = 300 }
node a : cnn_tiny  [target]
node t : cnn_small [frozen, init="teacher.pt"]
label -> a : through
t     -> a : through kl(T=2)
