# kl_from_label.kt: the loss from `label` is cross-entropy (paper eq. 1); T means nothing there
# expect: E312
graph kl_from_label
data digits { val_split = 300 }
node a : cnn_tiny [target]
label -> a : through kl(T=2)
