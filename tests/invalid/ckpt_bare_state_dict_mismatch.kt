# ckpt_bare_state_dict_mismatch.kt: a bare state_dict of an mlp for a cnn_small node (the test writes it)
# expect: E602
graph ckpt_bare_state_dict_mismatch
data digits { val_split = 300 }
node a : cnn_tiny  [target]
node t : cnn_small [frozen, init="teacher.pt"]
label -> a : through
t     -> a : through kl(T=2)
