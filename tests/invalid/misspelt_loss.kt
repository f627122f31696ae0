# misspelt_loss.kt: a loss name with a typo
# expect: E203
graph misspelt_loss
data digits { val_split = 300 }
node a : cnn_tiny [target]
node b : cnn_small
label -> a : through
label -> b : through
b     -> a : through kld(T=2)
