# misspelt_optimizer.kt: an optimizer name with a typo
# expect: E207
graph misspelt_optimizer
data digits { val_split = 300 }
train { optimizer = sdg(lr=0.1) }
node a : cnn_tiny [target]
label -> a : through
