# ckpt_tampered.kt: a checkpoint dclang wrote, changed after it was written (the test flips a byte)
# expect: E603
graph ckpt_tampered
data digits { val_split = 300 }
node a : cnn_tiny  [target]
node t : cnn_small [frozen, init="teacher.pt"]
label -> a : through
t     -> a : through kl(T=2)
