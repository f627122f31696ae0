# wrong_kind_of_value.kt: epochs is a whole number
# expect: E400
graph wrong_kind_of_value
data digits { val_split = 300 }
train { epochs = 8.5 }
node a : cnn_tiny [target]
label -> a : through
