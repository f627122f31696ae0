# misspelt_attribute.kt: `[traget]`; with no target left, that is reported too
# expect: E208 E305
graph misspelt_attribute
data digits { val_split = 300 }
node a : cnn_tiny [traget]
label -> a : through
