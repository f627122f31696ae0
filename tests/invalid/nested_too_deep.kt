# nested_too_deep.kt: a list nested deeper than any value needs
# expect: E103
graph nested_too_deep
data digits { val_split = 300 }
train { epochs = [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]] }
node a : cnn_tiny [target]
label -> a : through
