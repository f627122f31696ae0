# ckpt_corrupt.kt: the checkpoint file is text, not a PyTorch checkpoint (the test writes it)
# expect: E601
graph ckpt_corrupt
data digits { val_split = 300 }
node a : cnn_tiny  [target]
node t : cnn_small [frozen, init="teacher.pt"]
label -> a : through
t     -> a : through kl(T=2)
