# misspelt_loss_option.kt: the temperature is a capital `T`
# expect: E206
graph misspelt_loss_option
data digits { val_split = 300 }
node a : cnn_tiny [target]
node b : cnn_small
label -> a : through
label -> b : through
b     -> a : through kl(t=2)
