# optimizer_choice.kt: the optimizer itself cannot be a search site, only its options
# expect: E400
graph optimizer_choice
data digits { val_split = 300 }
train { optimizer = choice(sgd, adam) }
node a : cnn_tiny [target]
label -> a : through
