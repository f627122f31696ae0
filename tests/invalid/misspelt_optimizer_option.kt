# misspelt_optimizer_option.kt: an option of sgd with a typo
# expect: E206
graph misspelt_optimizer_option
data digits { val_split = 300 }
train { optimizer = sgd(lr=0.1, momentun=0.9) }
node a : cnn_tiny [target]
label -> a : through
